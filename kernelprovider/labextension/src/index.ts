/**
 * forkvm-branch: the JupyterLab command "Branch Kernel".
 *
 * It asks the forkvm server extension (POST api/forkvm/kernels/<id>/branch) to branch the
 * current notebook's kernel: the kernel's VM is live-migrated into a new VM that carries the
 * whole interpreter state (variables, imports, open files), and the server owns the new
 * kernel like any other. Then it saves a copy of the notebook as it is now (unsaved edits
 * included) as `<name>-branch-<N>.ipynb` next to it and opens that copy attached to the new
 * kernel, so both notebooks go on independently from the same state.
 *
 * Available from the command palette, the Kernel menu and a notebook toolbar button.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification, showErrorMessage, ToolbarButton } from '@jupyterlab/apputils';
import { PathExt, URLExt } from '@jupyterlab/coreutils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, ServerConnection } from '@jupyterlab/services';

const COMMAND = 'forkvm:branch-kernel';
const LABEL = 'Branch Kernel';

/** The server extension's answer: a kernel model, plus what forkvm says about the branch. */
interface IBranchModel extends Kernel.IModel {
  forkvm?: { parent?: string; source_pause_s?: number | null; launch_s?: number };
}

/** POST the branch request; throws an Error carrying the server's message. */
async function requestBranch(settings: ServerConnection.ISettings, kernelId: string): Promise<IBranchModel> {
  const url = URLExt.join(settings.baseUrl, 'api/forkvm/kernels', encodeURIComponent(kernelId), 'branch');
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, { method: 'POST' }, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  let body: any = {};
  try {
    body = await response.json();
  } catch {
    body = {};
  }
  if (!response.ok) {
    if (response.status === 404 && !body.message) {
      throw new Error('The forkvm server extension is not enabled in this Jupyter server.');
    }
    throw new Error(body.message || `${response.status} ${response.statusText}`);
  }
  return body as IBranchModel;
}

/** `dir/name-branch-N.ipynb` for the first N that names no existing file. */
async function freeBranchPath(app: JupyterFrontEnd, path: string): Promise<string> {
  const dir = PathExt.dirname(path);
  const ext = PathExt.extname(path) || '.ipynb';
  const stem = PathExt.basename(path, ext);
  for (let n = 1; n < 10000; n++) {
    const candidate = PathExt.join(dir, `${stem}-branch-${n}${ext}`);
    try {
      await app.serviceManager.contents.get(candidate, { content: false });
    } catch {
      return candidate; // 404: free
    }
  }
  throw new Error(`no free name for a branch of ${path}`);
}

async function branchNotebook(app: JupyterFrontEnd, docManager: IDocumentManager, panel: NotebookPanel): Promise<string> {
  const sessionContext = panel.sessionContext;
  await sessionContext.ready;
  const kernel = sessionContext.session?.kernel;
  if (!kernel) {
    throw new Error('This notebook has no running kernel to branch.');
  }
  const model = await requestBranch(app.serviceManager.serverSettings, kernel.id);

  // The copy holds the notebook as it is on screen now, matching the state the kernel had.
  const path = await freeBranchPath(app, panel.context.path);
  const content = panel.context.model.toJSON();
  try {
    await app.serviceManager.contents.save(path, { type: 'notebook', format: 'json', content });
    // Attach the new file to the branched kernel (a new session bound to the existing kernel id).
    docManager.open(path, 'Notebook', { id: model.id, name: model.name });
  } catch (error) {
    // Do not leave an orphan kernel behind when the notebook could not be created.
    await app.serviceManager.kernels.shutdown(model.id).catch(() => undefined);
    throw error;
  }
  const pause = model.forkvm?.source_pause_s;
  Notification.success(
    `Branched kernel into ${PathExt.basename(path)}` +
      (typeof pause === 'number' ? ` (source paused ${(pause * 1000).toFixed(0)} ms)` : ''),
    { autoClose: 5000 }
  );
  return path;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'forkvm-branch:plugin',
  description: 'Branch a running forkvm kernel into a copy of the notebook.',
  autoStart: true,
  requires: [INotebookTracker, IDocumentManager],
  optional: [ICommandPalette, IMainMenu],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    docManager: IDocumentManager,
    palette: ICommandPalette | null,
    mainMenu: IMainMenu | null
  ) => {
    const busy = new WeakSet<NotebookPanel>();

    const run = async (panel: NotebookPanel | null): Promise<string | undefined> => {
      if (!panel || busy.has(panel)) {
        return undefined;
      }
      busy.add(panel);
      try {
        return await branchNotebook(app, docManager, panel);
      } catch (error) {
        await showErrorMessage(LABEL, error as Error);
        return undefined;
      } finally {
        busy.delete(panel);
      }
    };

    app.commands.addCommand(COMMAND, {
      label: LABEL,
      caption: 'Fork the running kernel (all its state) into a new kernel and a copy of this notebook',
      isEnabled: () => !!tracker.currentWidget?.sessionContext.session?.kernel,
      execute: () => run(tracker.currentWidget)
    });
    tracker.currentChanged.connect(() => app.commands.notifyCommandChanged(COMMAND));

    palette?.addItem({ command: COMMAND, category: 'Kernel Operations' });
    mainMenu?.kernelMenu.addGroup([{ command: COMMAND }], 100);

    app.docRegistry.addWidgetExtension('Notebook', {
      createNew: (panel: NotebookPanel) => {
        const button = new ToolbarButton({
          className: 'jp-forkvm-BranchButton',
          label: 'Branch',
          tooltip: `${LABEL}: fork this kernel, with all its state, into a copy of the notebook`,
          onClick: () => void run(panel)
        });
        panel.toolbar.insertAfter('cellType', 'forkvm-branch', button);
        return button;
      }
    });
  }
};

export default plugin;
