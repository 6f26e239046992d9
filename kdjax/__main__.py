from kdjax.cli import main

main()
