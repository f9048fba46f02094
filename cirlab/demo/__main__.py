"""`python -m cirlab.demo RUN`: the same as `cirlab-demo RUN`."""

from cirlab.demo.app import main

main()
