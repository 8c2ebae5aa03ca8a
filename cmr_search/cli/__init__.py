"""The `cmr` command line: parsing and printing over the libraries below it."""
