from genssd_cli.cli.app import main

# Guarded: vLLM's engine starts worker processes by spawning, which imports this module again.
if __name__ == "__main__":
    main()
