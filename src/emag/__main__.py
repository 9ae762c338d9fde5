"""``python -m emag``: the command line (what ``torchrun -m emag sample ...`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
