"""From run directories to the paper's figures and tables. Reads records only: no torch, no training code.

collect (run dirs, runs.csv or W&B → one tidy DataFrame) → reading (which metric, why) → cells and intervals
(per-seed cells, 95% intervals, paired differences) → tables, figures, claims, provenance → report (md), html_page.
"""
