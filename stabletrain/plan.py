"""`python -m stabletrain.plan <overrides>`: see stabletrain.cli.plan."""

from stabletrain.cli.plan import main

if __name__ == "__main__":
    main()
