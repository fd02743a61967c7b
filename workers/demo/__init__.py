"""``retrain demo``: the whole loop on this machine, three scenarios, in about a minute."""
