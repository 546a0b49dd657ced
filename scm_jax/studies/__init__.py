"""The paper's claims, tested on digits (one command each, resumable, a JSON table and a PNG):

    python -m scm_jax.studies.continuous_vs_discrete --workdir=DIR   # sCM Fig. 5(c)
    python -m scm_jax.studies.vsd_vs_scd --workdir=DIR               # Fig. 7, Table 7
    python -m scm_jax.studies.avsd_sweep --workdir=DIR               # aVSD's lambda, F_phi lr, length
    python -m scm_jax.studies.compute --workdir=DIR                  # quality vs training compute
    python -m scm_jax.studies.stabilizers --workdir=DIR              # Sec. 4 ablations
    python -m scm_jax.studies.robustness --workdir=DIR               # the defaults, other seeds
    python -m scm_jax.studies.posthoc --workdir=DIR                  # FD against the EMA length

Options shared by all (`runner.main`; `--help` lists them): --config (default experiments/digits.py),
--size=tiny (seconds-long, what the tests run), --teacher_workdir=DIR (reuse the teacher of a
digits run instead of training one), --only=RUN,RUN, --seeds=N (every run with N student seeds:
mean and spread), --config.<key>=<value> (an override of every run).
"""
