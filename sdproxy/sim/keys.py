"""Sim: typed application keys shared by the app and its handlers."""

from __future__ import annotations

from aiohttp import web

from sdproxy.sim.state import SimPod

#: the pod's state, one per aiohttp application
POD = web.AppKey("sim_pod", SimPod)
