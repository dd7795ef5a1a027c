"""Reading and running finished runs: a workdir and its figures, suites of runs, their
statistics and tables, the explanation under a table."""
