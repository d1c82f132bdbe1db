"""wbroker: attach to models that wbrokerd loaded once, as zero-copy tensors.

  import wbroker
  with wbroker.connect() as client:
      lease = client.attach("org/name", revision="3f6b9d2")
      lease.revision          # the full commit it resolved to
      lease.tensors           # Mapping[str, torch.Tensor], read-only memory
"""
from .client import Client, connect
from .errors import (BrokerError, BrokerUnavailable, ConnectionLost, ModelNotFound, PermissionDenied,
                     ProtocolError, WbrokerError)
from .lease import Lease, TensorInfo
from .protocol import default_socket_path

__version__ = "0.1.0"
__all__ = ["Client", "connect", "Lease", "TensorInfo", "default_socket_path", "WbrokerError",
           "BrokerUnavailable", "ConnectionLost", "ProtocolError", "BrokerError", "ModelNotFound",
           "PermissionDenied"]
