"""What the tests of every stage need (tests/engine, tests/study, tests/registry; each has its
own conftest.py with its fixtures). The helpers are in helpers.py.

pytest imports this file first and puts tests/ on sys.path (its default "prepend" import mode),
so that test modules in the stage folders can import `helpers` and `servers`.
"""

pytest_plugins = ["servers"]  # the real PostgreSQL cluster and mlflow server fixtures
