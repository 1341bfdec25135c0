"""PolicyService: named policies trained from client-collected experience. Thin: proto -> core -> proto."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np

from rl_service.core.errors import CapacityExceeded, InvalidRequest, quoted
from rl_service.core.policies.manager import PolicyManager
from rl_service.transport import policy_convert as convert
from rl_service.transport.auth import current_principal, require_owner
from rl_service.transport.error_mapping import guarded
from rl_service.transport.stream_slots import StreamSlots
from rl_service_proto.v1 import policy_pb2 as pb
from rl_service_proto.v1 import policy_pb2_grpc as pb_grpc

# Bytes one transition's values take once assembled (float32 states/actions/rewards, one byte per done).
_FLOAT_BYTES = 4


class PolicyServicer(pb_grpc.PolicyServiceServicer):  # type: ignore[misc]
    """The named-policies API."""

    def __init__(self, manager: PolicyManager, max_batch_bytes: int, stream_slots: StreamSlots) -> None:
        self._manager = manager
        self._max_batch_bytes = max_batch_bytes
        self._stream_slots = stream_slots

    @guarded
    def CreatePolicy(self, request: pb.CreatePolicyRequest, context: grpc.ServicerContext) -> pb.PolicyInfo:
        if not request.HasField("spec"):
            raise InvalidRequest("spec is required (observation_shape and discrete_n or box)", field="spec")
        snapshot = self._manager.create(request.policy_id, convert.spec_request_from_proto(request.spec),
                                        request.initial_weights, owner=current_principal().owner)
        return convert.snapshot_to_proto(snapshot)

    @guarded
    def GetPolicy(self, request: pb.PolicyRequest, context: grpc.ServicerContext) -> pb.PolicyInfo:
        return convert.snapshot_to_proto(self._manager.get(request.policy_id))

    @guarded
    def ListPolicies(self, request: pb.ListPoliciesRequest, context: grpc.ServicerContext
                     ) -> pb.ListPoliciesResponse:
        return pb.ListPoliciesResponse(policies=[convert.snapshot_to_proto(s) for s in self._manager.list_policies()])

    @guarded
    def DeletePolicy(self, request: pb.PolicyRequest, context: grpc.ServicerContext) -> pb.DeletePolicyResponse:
        self._require_owner(request.policy_id)
        self._manager.delete(request.policy_id)
        return pb.DeletePolicyResponse()

    @guarded
    def SendTrainingBatch(self, request: pb.TrainingBatch, context: grpc.ServicerContext) -> pb.TrainingBatchResult:
        self._require_owner(request.policy_id)
        return self._send(request, [request])

    @guarded
    def SendTrainingBatchStream(self, request_iterator: Iterator[pb.TrainingBatch], context: grpc.ServicerContext
                                ) -> pb.TrainingBatchResult:
        chunks: list[pb.TrainingBatch] = []
        size = 0
        for chunk in request_iterator:
            if not chunks:
                self._require_owner(chunk.policy_id)  # before any more of the stream is read
            if chunks and chunk.policy_id and chunk.policy_id != chunks[0].policy_id:
                raise InvalidRequest(f"policy_id: chunk {len(chunks)} names {quoted(chunk.policy_id)}, the stream "
                                     f"started with {quoted(chunks[0].policy_id)}", field="policy_id")
            size += (_FLOAT_BYTES * (len(chunk.states) + len(chunk.actions) + len(chunk.rewards) + len(chunk.log_probs))
                     + len(chunk.dones) + len(chunk.truncated))
            if size > self._max_batch_bytes:
                raise CapacityExceeded(f"batch: the assembled batch exceeds MAX_BATCH_BYTES={self._max_batch_bytes}"
                                       " bytes; send fewer transitions per batch", field="batch")
            chunks.append(chunk)
        if not chunks:
            raise InvalidRequest("batch: the stream carried no chunk", field="batch")
        return self._send(chunks[0], chunks)

    def _require_owner(self, policy_id: str) -> None:
        """Changing a policy takes its owner or an admin (errors for a missing or unknown id as the call itself)."""
        require_owner(current_principal(), self._manager.owner(policy_id), f"policy {policy_id!r}")

    def _send(self, head: pb.TrainingBatch, chunks: list[pb.TrainingBatch]) -> pb.TrainingBatchResult:
        def joined(name: str, dtype: type) -> np.ndarray:
            parts = [convert.floats(getattr(c, name), dtype) for c in chunks]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        outcome = self._manager.send_batch(
            head.policy_id, joined("states", np.float32), joined("actions", np.float64),
            joined("rewards", np.float64), joined("dones", np.bool_),
            expected_version=head.expected_version if head.HasField("expected_version") else None,
            flush=head.flush, return_model=head.return_model, sync=head.sync,
            truncated=joined("truncated", np.bool_), log_probs=joined("log_probs", np.float32),
            behaviour_version=head.behaviour_version if head.HasField("behaviour_version") else None)
        return convert.outcome_to_proto(outcome)

    @guarded
    def ComputeLogProb(self, request: pb.LogProbRequest, context: grpc.ServicerContext) -> pb.LogProbResponse:
        which = request.WhichOneof("which")
        log_probs, entropies, values, version = self._manager.log_prob(
            request.policy_id, convert.floats(request.states), convert.floats(request.actions, np.float64),
            version=request.version if which == "version" else None,
            checkpoint=request.checkpoint if which == "checkpoint" else None)
        return pb.LogProbResponse(log_probs=log_probs.tolist(), entropies=entropies.tolist(), values=values.tolist(),
                                  version=version)

    @guarded
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelBlob:
        if request.format not in (pb.MODEL_FORMAT_UNSPECIFIED, pb.TORCHSCRIPT, pb.SAFETENSORS):
            raise InvalidRequest(f"format: unknown model format {request.format}; use TORCHSCRIPT or SAFETENSORS",
                                 field="format")
        torchscript = request.format != pb.SAFETENSORS
        version, data = self._manager.model(request.policy_id, torchscript)
        return pb.ModelBlob(policy_id=request.policy_id, version=version, data=data,
                            format=pb.TORCHSCRIPT if torchscript else pb.SAFETENSORS,
                            durable_version=self._manager.durable_version(request.policy_id))

    @guarded
    def SetWeights(self, request: pb.SetWeightsRequest, context: grpc.ServicerContext) -> pb.PolicyInfo:
        self._require_owner(request.policy_id)
        snapshot = self._manager.set_weights(
            request.policy_id, request.safetensors,
            request.expected_version if request.HasField("expected_version") else None)
        return convert.snapshot_to_proto(snapshot)

    @guarded
    def WatchModelUpdates(self, request: pb.WatchModelRequest, context: grpc.ServicerContext
                          ) -> Iterator[pb.ModelUpdate]:
        # Each stream holds a server thread; the shared cap keeps unary RPCs answerable.
        with self._stream_slots.hold("WatchModelUpdates", "poll GetPolicy or retry later"):
            for update in self._manager.watch(request.policy_id, request.from_version, request.include_model,
                                              context.is_active):
                yield convert.update_to_proto(update)

    @guarded
    def SaveCheckpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointInfo:
        self._require_owner(request.policy_id)
        return convert.checkpoint_to_proto(self._manager.save_checkpoint(request.policy_id, request.name))

    @guarded
    def LoadCheckpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.PolicyInfo:
        self._require_owner(request.policy_id)
        return convert.snapshot_to_proto(self._manager.load_checkpoint(request.policy_id, request.name))

    @guarded
    def ListCheckpoints(self, request: pb.PolicyRequest, context: grpc.ServicerContext
                        ) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(
            checkpoints=[convert.checkpoint_to_proto(c) for c in self._manager.list_checkpoints(request.policy_id)])
