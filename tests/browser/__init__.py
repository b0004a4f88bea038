"""The browser test of index.html, run by ``make test-browser``; pytest does not collect it."""
