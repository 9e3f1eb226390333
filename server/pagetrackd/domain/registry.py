"""Tenants and their VMs."""

from __future__ import annotations

import re
from typing import Any

from pagetrackd.domain.errors import InvalidArgument, VmAlreadyExists, VmNotFound
from pagetrackd.domain.types import TenantId
from pagetrackd.domain.vm import Vm

_NAME_MAX = 63
_NAME_CHARS = re.compile(r"^[a-z0-9._-]+$")


def check_vm_name(name: str) -> None:
    """Raise InvalidArgument naming the rule a VM name breaks.

    Rules: 1 to 63 characters; lowercase letters, digits, '-', '_' and '.'; starts and
    ends with a letter or digit.
    """
    if not name:
        raise InvalidArgument("VM name is empty; give 1 to 63 characters")
    if len(name) > _NAME_MAX:
        raise InvalidArgument(f"VM name is {len(name)} characters; at most {_NAME_MAX}")
    if not _NAME_CHARS.match(name):
        raise InvalidArgument(
            f"VM name {name!r} may hold only lowercase letters, digits, '-', '_' and '.'"
        )
    if not (name[0].isalnum() and name[-1].isalnum()):
        raise InvalidArgument(f"VM name {name!r} must start and end with a letter or digit")


class Registry:
    """Every tenant's VMs. A tenant never sees another's: an unknown name and another
    tenant's VM raise the same VmNotFound."""

    def __init__(self) -> None:
        self._vms: dict[TenantId, dict[str, Vm]] = {}
        #: list_vms answers, kept until a VM is created or deleted (a ListVms page of a
        #: daemon with 100k VMs must not sort them all)
        self._sorted: dict[TenantId | None, list[tuple[TenantId, Vm]]] = {}

    def create_vm(
        self, tenant: TenantId, name: str, *, vm: Vm | None = None, **options: Any
    ) -> Vm:
        """Create a VM named ``name`` for ``tenant``; options go to :class:`Vm`. Given
        ``vm`` (made apart, named ``name``), that VM is registered instead."""
        check_vm_name(name)
        vms = self._vms.get(tenant, {})
        if name in vms:
            raise VmAlreadyExists(f"VM {name!r} already exists")
        if vm is None:
            vm = Vm(name, **options)
        elif vm.name != name:
            raise InvalidArgument(f"VM {vm.name!r} cannot be registered as {name!r}")
        self._vms.setdefault(tenant, {})[name] = vm
        self._sorted.clear()
        return vm

    def get_vm(self, tenant: TenantId, name: str) -> Vm:
        """The tenant's VM called ``name``."""
        vm = self._vms.get(tenant, {}).get(name)
        if vm is None:
            raise VmNotFound(f"VM {name!r} not found", name=name)
        return vm

    def list_vms(self, tenant: TenantId | None = None) -> list[tuple[TenantId, Vm]]:
        """(tenant, VM) pairs sorted by tenant and name; all tenants when ``tenant`` is None.
        The caller must not change the list."""
        out = self._sorted.get(tenant)
        if out is None:
            out = []
            for t in sorted(self._vms):
                if tenant is not None and t != tenant:
                    continue
                out.extend((t, self._vms[t][n]) for n in sorted(self._vms[t]))
            self._sorted[tenant] = out
        return out

    def vms_of(self, tenant: TenantId) -> list[Vm]:
        """The tenant's VMs, in no particular order (cheap: no sorting)."""
        return list(self._vms.get(tenant, {}).values())

    def count_vms(self, tenant: TenantId) -> int:
        """How many VMs ``tenant`` has."""
        return len(self._vms.get(tenant, {}))

    def delete_vm(self, tenant: TenantId, name: str) -> None:
        """Delete a VM: notifiers hear every region go, plugins detach, state is freed."""
        vm = self.get_vm(tenant, name)
        vm.close()
        del self._vms[tenant][name]
        self._sorted.clear()
        if not self._vms[tenant]:
            del self._vms[tenant]
