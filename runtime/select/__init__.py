"""Data selection: the eq. 11 score of candidate windows and the top-m selection."""
