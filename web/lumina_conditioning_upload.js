// Upload button for Lumina Load Conditioning: sends a saved encoding (.safetensors) to ComfyUI's input folder
// through the same /upload/image route LoadImage uses (it stores any file), then selects it in the list.
// The node declares {"file_upload": true}, ComfyUI's marker for non-image uploads; the frontend shipped with
// ComfyUI 0.33 draws no button for it, so this extension does.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "LuminaLoadConditioning";
const INPUT = "conditioning_file";

async function upload(file, widget) {
  const body = new FormData();
  body.append("image", file);
  body.append("type", "input");
  const resp = await api.fetchApi("/upload/image", { method: "POST", body });
  if (resp.status !== 200) {
    alert(`Uploading ${file.name} failed: ${resp.status} ${resp.statusText}`);
    return;
  }
  const data = await resp.json();
  const name = data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
  if (!widget.options.values.includes(name)) widget.options.values.push(name);
  widget.value = name;
  widget.callback?.(name);
}

app.registerExtension({
  name: "ComfyUI-Lumina.UploadConditioning",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === INPUT);
      if (!widget) return result;
      const picker = document.createElement("input");
      picker.type = "file";
      picker.accept = ".safetensors";
      picker.style.display = "none";
      picker.onchange = async () => {
        if (picker.files.length) await upload(picker.files[0], widget);
        picker.value = "";
      };
      document.body.append(picker);
      const button = this.addWidget("button", "choose encoding to upload", null, () => picker.click(), {
        serialize: false,
      });
      button.serialize = false;
      const onRemoved = this.onRemoved;
      this.onRemoved = function () {
        picker.remove();
        return onRemoved?.apply(this, arguments);
      };
      return result;
    };
  },
});
