"""The incremental strategies by name (METHOD.md section 8); each is a small module stating what differs."""

from cimis.incremental.strategies.ft import FineTuning
from cimis.incremental.strategies.ilt import ILT
from cimis.incremental.strategies.joint import Joint
from cimis.incremental.strategies.lwf import LwF
from cimis.incremental.strategies.mib import MiB
from cimis.incremental.strategies.pgcd_dapd import PGCDDAPD
from cimis.incremental.strategies.plop import PLOP
from cimis.incremental.strategies.pseudo_labels import PseudoLabels

STRATEGIES = {cls.name: cls for cls in (PGCDDAPD, FineTuning, PseudoLabels, LwF, ILT, MiB, PLOP, Joint)}
DEFAULT_STRATEGY = PGCDDAPD.name
