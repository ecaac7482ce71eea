"""Client-side federated algorithms for PyTorch training scripts: FedProx and SCAFFOLD.

    from hauler.algorithms import fedprox, scaffold

Helpers a job's script calls between `hauler.receive("torch")` and `hauler.send()`. They read
the global model where the site received it (torch tensors viewing its model file, no copy)
and keep a site's own state in memory-mapped files of its work folder, so they run the same
under `hauler simulate` and on a real federation. They sit above the client API; nothing in
Hauler imports them. They work on the script's own torch tensors and import nothing of PyTorch
themselves, so a model module can call `scaffold.layout` without it; where they need it they
say `pip install 'hauler[torch]'`.
"""
