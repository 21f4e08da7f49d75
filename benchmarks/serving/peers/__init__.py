"""One driver per system compared, all run on the same traces."""

from benchmarks.serving.peers.base import Peer
from benchmarks.serving.peers.llamacpp_peer import LlamaCppPeer
from benchmarks.serving.peers.loraserve_peer import LoraservePeer
from benchmarks.serving.peers.transformers_peer import TransformersPeer
from benchmarks.serving.peers.vllm_peer import VLLMPeer

PEERS: dict[str, type[Peer]] = {peer.name: peer for peer in (LoraservePeer, VLLMPeer, TransformersPeer, LlamaCppPeer)}
