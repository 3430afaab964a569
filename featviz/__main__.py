"""``python -m featviz`` (also what ``torchrun -m featviz`` runs)."""

from featviz.cli import main

if __name__ == "__main__":
    main()
