"""Named experiments of the paper: `python -m experiments.run NAME`."""
