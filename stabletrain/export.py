"""`python -m stabletrain.export`: see stabletrain.cli.interop."""

from stabletrain.cli.interop import export_main

if __name__ == "__main__":
    export_main()
