"""Tables and figures: terminal/Markdown tables, ROC and confusion plots, grids, reports."""
