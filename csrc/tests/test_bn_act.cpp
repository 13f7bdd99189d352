// C++ test of resfast::bn_act through the dispatcher, against ATen ops (NCHW and channels_last).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("resfast::bn_act", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  int failures = 0;
  for (bool channels_last : {false, true}) {
    auto x = at::randn({2, 5, 3, 7}, at::kDouble);
    if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto s = at::randn({5}, at::kDouble), b = at::randn({5}, at::kDouble), r = at::randn_like(x);
    auto y = op.call(x, s, b, r, true);
    auto ref = at::relu(x * s.view({1, 5, 1, 1}) + b.view({1, 5, 1, 1}) + r);
    if (!at::allclose(y, ref)) {
      std::cerr << "bn_act mismatch (channels_last=" << channels_last << ")\n";
      ++failures;
    }
  }
  std::cout << (failures ? "FAILED" : "OK") << "\n";
  return failures ? 1 : 0;
}
