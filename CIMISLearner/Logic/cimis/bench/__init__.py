"""``cimis bench``: class-incremental benchmarks (METHOD.md section 9) with resumable units and reports.

schedule.py (steps and class order), methods.py (strategies and ablated variants), config.py (what a run
is, and the output folder's claim), presets.py (--quick, --full), runner.py (the units), results.py (the
output folder's layout and a unit's stored result), memory.py (peak memory), report.py (tables),
plots.py (pictures), ablation.py (METHOD.md section 7's table), command.py (the command line).
"""
