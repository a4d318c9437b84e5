"""The performance harness behind ``make bench``: dpolab.train against TRL's DPOTrainer, measured side by side.

    python -m dpolab.bench            # GPT-2 124M, 3 repeats, ablations
    python -m dpolab.bench --quick    # a small GPT-2: the same harness, a smoke test

``__main__.py`` runs the comparison and prints the table, ``workers.py`` holds what each subprocess measures,
``flops.py`` the minimal work of a pair and the matmul ceiling it is compared with.
"""
