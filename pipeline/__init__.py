"""Event producers (synthetic generator, dataset replay) and the PyFlink feature job."""
