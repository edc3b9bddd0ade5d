"""The run report: one self-contained HTML page (RUN_DIR/report/index.html) and its PNGs — the run read back
(data.py), the figures (figures.py), the page (page.py), the baselines a searched merge is compared with
(baselines.py), and writing it atomically, once or on a timer while a search runs (write.py)."""
