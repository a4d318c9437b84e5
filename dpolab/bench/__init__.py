"""The performance harness behind ``make bench``: dpolab.train against TRL's DPOTrainer, measured side by side.

    python -m dpolab.bench            # GPT-2 124M, 3 repeats, ablations: a few minutes on 2 cores
    python -m dpolab.bench --quick    # a small GPT-2: about a minute

``__main__.py`` runs the comparison and prints the table, ``workers.py`` holds what each subprocess measures,
``flops.py`` the minimal work of a pair and the matmul ceiling it is compared with.
"""
