"""Small trained models shipped for the demo and the tests (made by `itmrt make-small-models`)."""
