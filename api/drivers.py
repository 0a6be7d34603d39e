"""GET /v1/drivers: the hardware types and the driver_info keys each one takes."""
from __future__ import annotations

from flask import Blueprint

from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import base_url
from labmetal.api.errors import not_found

blueprint = Blueprint("drivers", __name__)


def _view(name: str, hosts: list[str]) -> dict:
    base = base_url()
    driver = services().drivers[name]
    return {"name": name, "hosts": hosts, "type": "dynamic", "description": driver.description,
            "default_power_interface": driver.power.name,
            "enabled_power_interfaces": [driver.power.name],
            "links": [{"href": f"{base}/v1/drivers/{name}", "rel": "self"},
                      {"href": f"{base}/drivers/{name}", "rel": "bookmark"}],
            "properties": [{"href": f"{base}/v1/drivers/{name}/properties", "rel": "self"},
                           {"href": f"{base}/drivers/{name}/properties", "rel": "bookmark"}]}


def _hosts() -> list[str]:
    return sorted(services().registry.live())


@blueprint.get("/v1/drivers")
@authorize("driver:get")
def list_drivers():
    hosts = _hosts()
    return {"drivers": [_view(name, hosts) for name in sorted(services().drivers)]}


@blueprint.get("/v1/drivers/<name>")
@authorize("driver:get")
def show_driver(name: str):
    if name not in services().drivers:
        raise not_found(f"Driver {name} could not be found.")
    return _view(name, _hosts())


@blueprint.get("/v1/drivers/<name>/properties")
@authorize("driver:get")
def driver_properties(name: str):
    driver = services().drivers.get(name)
    if driver is None:
        raise not_found(f"Driver {name} could not be found.")
    return {key: (f"{field.description} Required." if field.required else field.description)
            for key, field in driver.power.fields.items()}
