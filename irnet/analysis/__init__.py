"""Analysis of trained networks, without Lightning: stability, attacks, gradient fidelity, plots.

* :mod:`~irnet.analysis.stability`: stability functions of the θ-method and per-layer spectra;
* :mod:`~irnet.analysis.attacks`: noise and gradient attacks (FGSM, PGD);
* :mod:`~irnet.analysis.strong_attacks`: attacks that see through gradient masking;
* :mod:`~irnet.analysis.fidelity`: how close a cheap backward is to the exact gradient;
* :mod:`~irnet.analysis.plotting`: the figures the callbacks and studies draw.

Import the module you need (``from irnet.analysis.attacks import pgd``); this package
imports nothing itself, so that ``import irnet`` does not load matplotlib.
"""
