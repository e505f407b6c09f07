"""An mmengine model trained by its Runner (one param group per parameter, the classifier at 10x lr, a
linear warmup then a cosine schedule whose floor is a ratio of each group's base lr), and the new code: the
classifier registered first. Imported by tests/test_mmengine.py only when mmengine (and its OpenCV) is installed."""
import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch import nn

OPTIM = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-4),
             paramwise_cfg=dict(custom_keys={"classifier": dict(lr_mult=10.0)}))
SCHEDULERS = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2),
              dict(type="CosineAnnealingLR", T_max=4, eta_min_ratio=0.1, by_epoch=False, begin=2, end=6)]


class Net(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.classifier = nn.Linear(4, 5)

    def forward(self, inputs, labels, mode="loss"):
        out = self.classifier(torch.relu(self.bn(self.conv(inputs))).mean(dim=(2, 3)))
        return {"loss": F.cross_entropy(out, labels)}


class NetHeadFirst(Net):
    def __init__(self):
        BaseModel.__init__(self)
        self.classifier = nn.Linear(4, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def head_first():
    from mmengine.optim import build_optim_wrapper
    model = NetHeadFirst()
    return model, build_optim_wrapper(model, OPTIM).optimizer


def run(model, work_dir, iters, resume=None):
    from mmengine.runner import Runner
    runner = Runner(
        model=model, work_dir=str(work_dir), experiment_name="run",
        train_dataloader=dict(dataset=Data(), sampler=dict(type="DefaultSampler", shuffle=False), batch_size=4,
                              collate_fn=dict(type="default_collate"), num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=1000),
        optim_wrapper=OPTIM, param_scheduler=SCHEDULERS,
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1000)),
        randomness=dict(seed=0), load_from=str(resume) if resume else None, resume=resume is not None,
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")), visualizer=None, log_level="ERROR")
    runner.train()
    return runner
