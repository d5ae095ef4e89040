"""Views of a finished run: the HTML page, the matplotlib figures, the post-hoc diagnosis of a run's logs, and
the marks they share. ``lightning_diag.findings`` stays the contract (``diagnosis.json``); these only read it.
"""
