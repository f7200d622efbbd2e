"""From run directories to the paper's figures and tables. Reads records only: no torch, no training code.

collect (run dirs, runs.csv or W&B → one tidy DataFrame) → tables, figures → report (md + html).
"""
