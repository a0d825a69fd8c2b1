from swin.cli import main

main()
