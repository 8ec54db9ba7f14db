"""python -m tinyv.cli"""
from tinyv.cli.main import main

main()
