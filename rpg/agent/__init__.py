"""The rpg agent: runs units on a pilot's resource (``python -m rpg.agent --config FILE``)."""
