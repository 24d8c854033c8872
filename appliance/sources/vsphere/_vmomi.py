"""pyVmomi, typed as Any for mypy --strict.

pyVmomi's generated bindings are only partly annotated (untyped constructors, Optional
everywhere a vCenter never returns None); typing every call site would be noise. The
boundary is this module: everything vSphere-typed is ``Any`` inside the source.
"""

from typing import Any

import pyVmomi
from pyVim import connect as _connect

vim: Any = pyVmomi.vim
vmodl: Any = pyVmomi.vmodl
SmartStubAdapter: Any = _connect.SmartStubAdapter
