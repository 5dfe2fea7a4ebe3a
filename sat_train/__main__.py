"""python -m sat_train → sat_train.cli.main()."""

from .cli import main

if __name__ == "__main__":
    main()
