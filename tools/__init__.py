"""The tools: benchmarks and checks around ddpm.py, each run on its own from the repository root
(python -m tools.bench, python -m tools.gpu_check, python -m tools.gpu_run, python -m
tools.recipe_study, python -m tools.distill_study, python -m tools.consistency_study, python -m
tools.solver_study, python -m tools.solvers_vs_diffusers, python -m tools.demo_picture, python -m
tools.versions_line; the shell scripts lock.sh and behaviour_check.sh).

A tool may import anything of the project; nothing of the project imports a tool but another
tool.
"""
