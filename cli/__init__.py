"""The ``tinyv`` command line: parses and prints, the work lives in the library."""
