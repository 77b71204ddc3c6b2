"""The hub: lifecycles, binding, the zerorpc service for agents, and launchers."""
