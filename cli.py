"""python cli.py fit|validate|test|predict --config configs/....yaml"""

from swin.cli import main

if __name__ == "__main__":
    main()
