"""LSTM-guided pruning ("Where to Prune: Using LSTM to Guide End-to-end Pruning"), registered as ``lstm``.

An LSTM reads the network one channel group at a time and decides which groups the next pruning
step prunes; each selected group loses a share of its filters (the least important by the energy
the next layers read from them), the next layers' energy is restored and a short distillation
recovers the child; REINFORCE trains the LSTM on the children's held-out accuracy traded against
their cost (the device's predicted latency, or FLOPs). The modules: :mod:`.tokens` (the encoding),
:mod:`.controller` (the policy and REINFORCE), :mod:`.step` (one pruning step), :mod:`.search` (the
loop, beam, cache, budget, state), :mod:`.method` (the registered method) and :mod:`.sensitivity`
(the layer-sensitivity picture). docs/lstm.md describes the method and its settings.
"""

from hwprune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Controller": "hwprune.pruning.lstm.controller",
    "RandomController": "hwprune.pruning.lstm.controller",
    "Reinforce": "hwprune.pruning.lstm.controller",
    "encode": "hwprune.pruning.lstm.tokens",
    "Net": "hwprune.pruning.lstm.step",
    "Surgeon": "hwprune.pruning.lstm.step",
    "LSTMConfig": "hwprune.pruning.lstm.search",
    "LSTMSearch": "hwprune.pruning.lstm.search",
    "LSTMResult": "hwprune.pruning.lstm.search",
    "config_from_options": "hwprune.pruning.lstm.search",
    "LSTMPruning": "hwprune.pruning.lstm.method",
    "sensitivity_figure": "hwprune.pruning.lstm.sensitivity",
    "save_sensitivity": "hwprune.pruning.lstm.sensitivity",
})
