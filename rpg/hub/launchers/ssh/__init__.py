"""SSH pilots: the agent runs on another machine, reached with paramiko.

``target`` (where to, and which host keys to trust), ``connection`` (one paramiko connection,
its remote commands and SFTP pool), ``tunnel`` (the reverse port forward's pump thread),
``scripts`` (the remote shell scripts and the rpg package they unpack), ``launcher``
(SSHLauncher: launch, poll, stop). The hub's client:// staging over this connection is
``rpg.staging``'s.
"""

from rpg.hub.launchers.ssh.connection import ConnectionLost, SSHConnection
from rpg.hub.launchers.ssh.launcher import SSHLauncher
from rpg.hub.launchers.ssh.target import SSHTarget, fingerprint
from rpg.hub.launchers.ssh.tunnel import TunnelPump

__all__ = ["ConnectionLost", "SSHConnection", "SSHLauncher", "SSHTarget", "TunnelPump",
           "fingerprint"]
