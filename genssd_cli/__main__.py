from genssd_cli.cli import main

main()
