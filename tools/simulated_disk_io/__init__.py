"""The slow-disk stress harness (server, clients, stress command); see README.md beside this file.

In the repository this is ``tools.simulated_disk_io``; installed (``pip install``) it is the
top-level package ``simulated_disk_io``, so no generic ``tools`` package is installed. Its modules
import each other relatively and the stress command starts its server under the name it was
itself imported as, so both names work.
"""
