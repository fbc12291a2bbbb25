"""`python -m stabletrain.evaluate`: see stabletrain.cli.interop."""

from stabletrain.cli.interop import evaluate_main

if __name__ == "__main__":
    evaluate_main()
