"""`python -m stabletrain.generate`: see stabletrain.cli.interop."""

from stabletrain.cli.interop import generate_main

if __name__ == "__main__":
    generate_main()
