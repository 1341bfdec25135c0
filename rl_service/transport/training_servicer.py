"""TrainingService: proto -> DTO, call the orchestrator, DTO -> proto. No business logic here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
import numpy as np

from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.core.runs.orchestrator import Orchestrator
from rl_service.transport import convert
from rl_service.transport.auth import current_principal, require_owner
from rl_service.transport.error_mapping import guarded
from rl_service.transport.stream_slots import StreamSlots
from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc


class TrainingServicer(pb_grpc.TrainingServiceServicer):  # type: ignore[misc]
    """The managed-runs API."""

    def __init__(self, orchestrator: Orchestrator, stream_slots: StreamSlots) -> None:
        self._orchestrator = orchestrator
        self._stream_slots = stream_slots

    @guarded
    def StartTraining(self, request: pb.StartTrainingRequest, context: grpc.ServicerContext
                      ) -> pb.StartTrainingResponse:
        record = self._orchestrator.start_run(convert.training_request_from_proto(request),
                                              owner=current_principal().owner)
        return pb.StartTrainingResponse(run_id=record.run_id)

    @guarded
    def GetTrainingStatus(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.TrainingStatus:
        return convert.status_to_proto(self._orchestrator.get(request.run_id))

    @guarded
    def WatchTraining(self, request: pb.RunRequest, context: grpc.ServicerContext) -> Iterator[pb.TrainingStatus]:
        # Each stream holds a server thread; the cap keeps unary RPCs (Act, Status) answerable.
        with self._stream_slots.hold("WatchTraining", "poll GetTrainingStatus or retry later"):
            for record in self._orchestrator.watch(request.run_id, context.is_active):
                yield convert.status_to_proto(record)

    @guarded
    def StopTraining(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.TrainingStatus:
        self._require_owner(request.run_id)
        return convert.status_to_proto(self._orchestrator.stop_run(request.run_id))

    @guarded
    def ResumeTraining(self, request: pb.ResumeTrainingRequest, context: grpc.ServicerContext) -> pb.TrainingStatus:
        self._require_owner(request.run_id)
        total = request.total_timesteps if request.HasField("total_timesteps") else None
        return convert.status_to_proto(self._orchestrator.resume_run(request.run_id, total))

    @guarded
    def DeleteRun(self, request: pb.DeleteRunRequest, context: grpc.ServicerContext) -> pb.DeleteRunResponse:
        self._require_owner(request.run_id)
        self._orchestrator.delete_run(request.run_id)
        return pb.DeleteRunResponse(run_id=request.run_id)

    def _require_owner(self, run_id: str) -> None:
        """Changing a run takes its owner or an admin (NOT_FOUND for an unknown run, as the call itself)."""
        require_owner(current_principal(), self._orchestrator.get(run_id).owner, f"run {run_id!r}")

    @guarded
    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        records = self._orchestrator.list_runs(convert.run_filter_from_proto(request))
        return pb.ListRunsResponse(runs=[convert.status_to_proto(r) for r in records])

    @guarded
    def Act(self, request: pb.ActRequest, context: grpc.ServicerContext) -> pb.ActResponse:
        observation = np.asarray(request.observation, dtype=np.float64)
        result = self._orchestrator.act(request.run_id, observation, request.deterministic, single=True,
                                        action_mask=_mask(request.action_mask), model=request.model)
        return convert.act_response_to_proto(result)

    @guarded
    def ActBatch(self, request: pb.ActBatchRequest, context: grpc.ServicerContext) -> pb.ActBatchResponse:
        observations = np.asarray(request.observations, dtype=np.float64)
        result = self._orchestrator.act(request.run_id, observations, request.deterministic, single=False,
                                        action_mask=_mask(request.action_masks), model=request.model)
        return convert.act_batch_response_to_proto(result)

    @guarded
    def GetRunHistory(self, request: pb.RunHistoryRequest, context: grpc.ServicerContext) -> pb.RunHistory:
        page = self._orchestrator.history(request.run_id, request.offset, request.limit)
        return convert.history_page_to_proto(page)

    @guarded
    def ExportModel(self, request: pb.ExportModelRequest, context: grpc.ServicerContext) -> pb.ExportModelResponse:
        exported = self._orchestrator.export(request.run_id, request.format, request.model)
        return convert.exported_model_to_proto(exported)

    @guarded
    def ListAlgorithms(self, request: pb.ListAlgorithmsRequest, context: grpc.ServicerContext
                       ) -> pb.ListAlgorithmsResponse:
        return convert.algorithms_to_proto(ALGORITHMS.values())


def _mask(flags: Sequence[bool]) -> np.ndarray | None:
    """A request's repeated bool action mask as an array, or None when it is empty (no mask)."""
    return np.asarray(flags, dtype=bool) if len(flags) else None
