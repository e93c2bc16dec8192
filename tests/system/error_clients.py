#!/usr/bin/python3
"""Calls that fail, made through GLib (Gio, as every GNOME program and gdbus do) and through
dbus-python; prints for each what the library made of the error: its name and its message.

Usage: error_clients.py ADDRESS|system DEST count N   (Fail(i) of org.agent.Test at /t, i < N)
       error_clients.py system org.agent.Workspaces service   (the service's own cases)
Prints one JSON object: {case: {"gio": [name, message], "dbus": [name, message]}}.
"""
import json
import sys

import dbus
import dbus.bus
from gi.repository import Gio, GLib

ADDRESS, DEST, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
MANAGER = ("/org/agent/Workspaces", "org.agent.Workspaces")


def cases():
    """(case, path, interface, method, GLib signature, GLib args, dbus-python args)."""
    if MODE == "count":
        for i in range(int(sys.argv[4])):
            yield (str(i), "/t", "org.agent.Test", "Fail", "(u)", (i,), (dbus.UInt32(i),))
        return
    yield ("no-such-skill", *MANAGER, "UpdateWorkspace", "(sa{sv})",
           ("host", {"skills": GLib.Variant("as", ["nosuch"])}),
           ("host", dbus.Dictionary({"skills": dbus.Array(["nosuch"], signature="s")},
                                    signature="sv")))
    yield ("invalid-name", *MANAGER, "CreateWorkspace", "(a{sv})",
           ({"name": GLib.Variant("s", "Bad_Name")},),
           (dbus.Dictionary({"name": "Bad_Name"}, signature="sv"),))
    yield ("unknown-key", *MANAGER, "CreateWorkspace", "(a{sv})",
           ({"name": GLib.Variant("s", "errors-x"), "colour": GLib.Variant("s", "red")},),
           (dbus.Dictionary({"name": "errors-x", "colour": "red"}, signature="sv"),))
    yield ("no-such-workspace", *MANAGER, "GetWorkspace", "(s)", ("nosuch-ws",), ("nosuch-ws",))
    yield ("protected", *MANAGER, "DestroyWorkspace", "(s)", ("host",), ("host",))
    yield ("file-not-found", *MANAGER, "StatFile", "(ssa{sv})",
           ("host", "/nonexistent/ü x", {}), ("host", "/nonexistent/ü x", dbus.Dictionary({}, signature="sv")))


def gio(conn, path, iface, method, sig, args):
    try:
        conn.call_sync(DEST, path, iface, method, GLib.Variant(sig, args), None,
                       Gio.DBusCallFlags.NONE, 10000, None)
    except GLib.Error as e:
        name = Gio.DBusError.get_remote_error(e)
        # What g_dbus_error_strip_remote_error() takes off (PyGObject hands it a copy).
        prefix = "GDBus.Error:%s: " % name
        message = e.message[len(prefix):] if e.message.startswith(prefix) else e.message
        return [name, message]
    return ["(no error)", ""]


def dbus_python(bus, path, iface, method, args):
    try:
        bus.get_object(DEST, path, introspect=False).get_dbus_method(method, iface)(*args)
    except dbus.exceptions.DBusException as e:
        return [e.get_dbus_name(), e.get_dbus_message()]
    return ["(no error)", ""]


if ADDRESS == "system":
    conn = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    bus = dbus.SystemBus()
else:
    conn = Gio.DBusConnection.new_for_address_sync(
        ADDRESS,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)
    bus = dbus.bus.BusConnection(ADDRESS)
out = {}
for case, path, iface, method, sig, gargs, dargs in cases():
    out[case] = {"gio": gio(conn, path, iface, method, sig, gargs),
                 "dbus": dbus_python(bus, path, iface, method, dargs)}
print(json.dumps(out))
